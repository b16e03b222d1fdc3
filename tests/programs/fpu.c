/*
 * fpu: SSE/AVX/x87 register state held live across dumps.
 *
 * One asm block loads distinct 256-bit patterns into ymm0..ymm15 (xmm only
 * without AVX), known values into r12..r15, a non-default MXCSR and x87
 * control word and two x87 stack values, writes "READY\n" with a raw write
 * syscall (so READY means "registers are loaded"), then busy-spins reading
 * test_stop from memory without touching any of those registers.  After
 * SIGTERM the same block stores everything to memory and C compares.  The
 * SIGTERM handler does not disturb them: the kernel saves/restores xstate.
 */
#include "lib.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>

struct regs {
	uint8_t  ymm[16][32];	/* 0 */
	uint64_t gpr[4];	/* 512: r12..r15 */
	uint32_t mxcsr;		/* 544 */
	uint16_t fcw;		/* 548 */
	uint8_t  pad[10];
	long double st[2];	/* 560, 576: pushed in this order, st[1] ends in st(0) */
} __attribute__((aligned(32)));

_Static_assert(offsetof(struct regs, gpr) == 512, "gpr offset");
_Static_assert(offsetof(struct regs, mxcsr) == 544, "mxcsr offset");
_Static_assert(offsetof(struct regs, fcw) == 548, "fcw offset");
_Static_assert(offsetof(struct regs, st) == 560, "st offset");

/* MXCSR: FZ | round toward zero | all exceptions masked | DAZ (default 0x1f80). */
#define TEST_MXCSR 0xffc0
/* x87 CW: round toward zero, 53-bit precision, all masked (default 0x037f). */
#define TEST_FCW   0x0e7f

#define LOAD_SEQ(mov, r) \
	mov " 0*32(%[in]), %%" r "0\n\t"  mov " 1*32(%[in]), %%" r "1\n\t" \
	mov " 2*32(%[in]), %%" r "2\n\t"  mov " 3*32(%[in]), %%" r "3\n\t" \
	mov " 4*32(%[in]), %%" r "4\n\t"  mov " 5*32(%[in]), %%" r "5\n\t" \
	mov " 6*32(%[in]), %%" r "6\n\t"  mov " 7*32(%[in]), %%" r "7\n\t" \
	mov " 8*32(%[in]), %%" r "8\n\t"  mov " 9*32(%[in]), %%" r "9\n\t" \
	mov " 10*32(%[in]), %%" r "10\n\t" mov " 11*32(%[in]), %%" r "11\n\t" \
	mov " 12*32(%[in]), %%" r "12\n\t" mov " 13*32(%[in]), %%" r "13\n\t" \
	mov " 14*32(%[in]), %%" r "14\n\t" mov " 15*32(%[in]), %%" r "15\n\t"
#define STORE_SEQ(mov, r) \
	mov " %%" r "0, 0*32(%[out])\n\t"  mov " %%" r "1, 1*32(%[out])\n\t" \
	mov " %%" r "2, 2*32(%[out])\n\t"  mov " %%" r "3, 3*32(%[out])\n\t" \
	mov " %%" r "4, 4*32(%[out])\n\t"  mov " %%" r "5, 5*32(%[out])\n\t" \
	mov " %%" r "6, 6*32(%[out])\n\t"  mov " %%" r "7, 7*32(%[out])\n\t" \
	mov " %%" r "8, 8*32(%[out])\n\t"  mov " %%" r "9, 9*32(%[out])\n\t" \
	mov " %%" r "10, 10*32(%[out])\n\t" mov " %%" r "11, 11*32(%[out])\n\t" \
	mov " %%" r "12, 12*32(%[out])\n\t" mov " %%" r "13, 13*32(%[out])\n\t" \
	mov " %%" r "14, 14*32(%[out])\n\t" mov " %%" r "15, 15*32(%[out])\n\t"

/* Everything except the vector loads/stores, shared by both variants. */
#define BODY(load, store) \
	load \
	"movq 512(%[in]), %%r12\n\t" "movq 520(%[in]), %%r13\n\t" \
	"movq 528(%[in]), %%r14\n\t" "movq 536(%[in]), %%r15\n\t" \
	"ldmxcsr 544(%[in])\n\t" "fldcw 548(%[in])\n\t" \
	"fldt 560(%[in])\n\t" "fldt 576(%[in])\n\t" \
	/* write(1, "READY\n", 6); rsi already holds the message */ \
	"movl $1, %%eax\n\t" "movl $1, %%edi\n\t" "movl $6, %%edx\n\t" "syscall\n\t" \
	"1: pause\n\t" "cmpl $0, (%[flag])\n\t" "je 1b\n\t" \
	store \
	"movq %%r12, 512(%[out])\n\t" "movq %%r13, 520(%[out])\n\t" \
	"movq %%r14, 528(%[out])\n\t" "movq %%r15, 536(%[out])\n\t" \
	"stmxcsr 544(%[out])\n\t" "fnstcw 548(%[out])\n\t" \
	"fstpt 576(%[out])\n\t" "fstpt 560(%[out])\n\t"

#define CONSTRAINTS \
	: : [in] "r"(in), [out] "r"(out), [flag] "r"(&test_stop), "S"(ready) \
	: "rax", "rcx", "rdx", "rdi", "r11", "r12", "r13", "r14", "r15", \
	  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", \
	  "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", \
	  "memory", "cc"

static const char ready[] = "READY\n";

static void run_avx(const struct regs *in, struct regs *out)
{
	asm volatile(BODY(LOAD_SEQ("vmovdqu", "ymm"), STORE_SEQ("vmovdqu", "ymm"))
		     "vzeroupper\n\t" CONSTRAINTS);
}

static void run_sse(const struct regs *in, struct regs *out)
{
	asm volatile(BODY(LOAD_SEQ("movdqu", "xmm"), STORE_SEQ("movdqu", "xmm"))
		     CONSTRAINTS);
}

static uint64_t mix(uint64_t x)
{
	x = (x + 1) * 0x9E3779B97F4A7C15ULL;
	x ^= x >> 31;
	x *= 0xBF58476D1CE4E5B9ULL;
	return x ^ (x >> 27);
}

int main(int argc, char **argv)
{
	static struct regs in, out;
	const uint32_t def_mxcsr = 0x1f80;
	const uint16_t def_fcw = 0x037f;
	int avx, width;

	test_init(argc, argv);
	__builtin_cpu_init();
	avx = __builtin_cpu_supports("avx");	/* also checks OS xstate support */
	width = avx ? 32 : 16;

	for (int r = 0; r < 16; r++)
		for (int lane = 0; lane < 4; lane++) {
			uint64_t v = mix((uint64_t)r * 4 + (uint64_t)lane);

			memcpy(&in.ymm[r][lane * 8], &v, 8);
		}
	for (int i = 0; i < 4; i++)
		in.gpr[i] = mix(100 + (uint64_t)i);
	in.mxcsr = TEST_MXCSR;
	in.fcw = TEST_FCW;
	in.st[0] = 3.14159265358979323846264338327950288L;
	in.st[1] = -1.0L / 3.0L;
	memset(&out, 0xee, sizeof(out));

	test_msg(avx ? "fpu: checking ymm0-15 (AVX)\n" : "fpu: checking xmm0-15 (no AVX)\n");
	if (avx)
		run_avx(&in, &out);	/* writes READY, spins until SIGTERM */
	else
		run_sse(&in, &out);
	/* Back to defaults before any C floating point code could run. */
	asm volatile("ldmxcsr %0\n\tfldcw %1" : : "m"(def_mxcsr), "m"(def_fcw));

	for (int r = 0; r < 16; r++)
		for (int b = 0; b < width; b++)
			if (out.ymm[r][b] != in.ymm[r][b])
				fail("%s%d byte %d: expected %#04x, got %#04x",
				     avx ? "ymm" : "xmm", r, b, in.ymm[r][b], out.ymm[r][b]);
	for (int i = 0; i < 4; i++)
		if (out.gpr[i] != in.gpr[i])
			fail("r%d: expected %#llx, got %#llx", 12 + i,
			     (unsigned long long)in.gpr[i], (unsigned long long)out.gpr[i]);
	if (out.mxcsr != in.mxcsr)
		fail("MXCSR: expected %#x, got %#x", in.mxcsr, out.mxcsr);
	if (out.fcw != in.fcw)
		fail("x87 control word: expected %#x, got %#x", in.fcw, out.fcw);
	for (int i = 0; i < 2; i++)
		if (memcmp(&out.st[i], &in.st[i], 10))	/* 80 bits used of 128 */
			fail("x87 stack value %d: expected %La, got %La", i,
			     in.st[i], out.st[i]);
	pass();
}
