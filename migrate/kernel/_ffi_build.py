"""cffi declarations, compiled out of line (ABI mode, no C compiler needed).

`make build` (or the first import) runs this to write ``_ffi_gen.py``, which
holds the parsed declarations: no C parsing at run time, so the first use of
a struct costs nothing inside a freeze window.
"""

from __future__ import annotations

import os

import cffi

CDEF = r"""
long syscall(long number, ...);

struct iovec { void *iov_base; size_t iov_len; };

ssize_t process_vm_readv(int pid, const struct iovec *local, unsigned long liovcnt,
                         const struct iovec *remote, unsigned long riovcnt,
                         unsigned long flags);
ssize_t process_vm_writev(int pid, const struct iovec *local, unsigned long liovcnt,
                          const struct iovec *remote, unsigned long riovcnt,
                          unsigned long flags);
int ioctl(int fd, unsigned long request, ...);
void *memcpy(void *dest, const void *src, size_t n);

/* arch/x86/include/asm/user_64.h */
struct user_regs_struct {
    unsigned long r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8;
    unsigned long rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs, eflags;
    unsigned long rsp, ss, fs_base, gs_base, ds, es, fs, gs;
};

/* include/uapi/linux/fs.h: PAGEMAP_SCAN */
struct page_region { uint64_t start; uint64_t end; uint64_t categories; };
struct pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};

/* include/uapi/linux/sched.h */
struct clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
             tls, set_tid, set_tid_size, cgroup;
};

/* include/uapi/linux/ptrace.h */
struct ptrace_rseq_configuration {
    uint64_t rseq_abi_pointer; uint32_t rseq_abi_size; uint32_t signature;
    uint32_t flags; uint32_t pad;
};
struct ptrace_peeksiginfo_args { uint64_t off; uint32_t flags; int32_t nr; };

/* include/uapi/linux/userfaultfd.h */
struct uffdio_api { uint64_t api; uint64_t features; uint64_t ioctls; };
struct uffdio_range { uint64_t start; uint64_t len; };
struct uffdio_register { struct uffdio_range range; uint64_t mode; uint64_t ioctls; };
struct uffdio_copy { uint64_t dst; uint64_t src; uint64_t len; uint64_t mode; int64_t copy; };
struct uffdio_zeropage { struct uffdio_range range; uint64_t mode; int64_t zeropage; };

/* libnftables(3), <nftables/libnftables.h>: in libnftables.so.1, dlopened
   by kernel/nftables.py (absent where the nftables package is not installed) */
struct nft_ctx;
struct nft_ctx *nft_ctx_new(uint32_t flags);
void nft_ctx_free(struct nft_ctx *ctx);
int nft_ctx_buffer_output(struct nft_ctx *ctx);
int nft_ctx_buffer_error(struct nft_ctx *ctx);
const char *nft_ctx_get_output_buffer(struct nft_ctx *ctx);
const char *nft_ctx_get_error_buffer(struct nft_ctx *ctx);
int nft_run_cmd_from_buffer(struct nft_ctx *nft, const char *buf);
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("migrate.kernel._ffi_gen", None)


def build() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ffibuilder.emit_python_code(os.path.join(here, "_ffi_gen.py"))


if __name__ == "__main__":
    build()
