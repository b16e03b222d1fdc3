"""BPF inspection of resources/seccomp.py on canned programs."""

import struct

from migrate.resources import seccomp


def ins(code, k, jt=0, jf=0):
    return struct.pack("<HBBI", code, jt, jf, k)


def test_returns_user_notif():
    ld = ins(0x20, 0)                       # BPF_LD|BPF_W|BPF_ABS nr
    jeq = ins(0x15, 39, 0, 1)               # BPF_JMP|BPF_JEQ|BPF_K getpid
    allow = ins(0x06, 0x7FFF0000)
    assert seccomp.returns_user_notif(ld + jeq + ins(0x06, 0x7FC00000) + allow)
    assert not seccomp.returns_user_notif(ld + jeq + ins(0x06, 0x00050000 | 30) + allow)
    # a return of the accumulator (0x16) cannot be judged: not refused
    assert not seccomp.returns_user_notif(ld + ins(0x16, 0))
