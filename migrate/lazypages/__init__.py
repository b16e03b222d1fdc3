"""The lazy-pages daemon (post-copy): userfaultfd events, fault service, prefetch."""
