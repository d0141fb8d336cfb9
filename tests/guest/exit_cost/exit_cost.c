/*
 * exit_cost: what one guest exit costs, seen from guest userspace (run by `siovmm-bench --exits`).
 * Each probe repeats one instruction that the hypervisor must intercept, in batches; the best
 * batch is reported (the least disturbed by the rest of the machine), as microseconds per
 * instruction:
 *   cpuid          handled inside KVM
 *   pic-read       port 0x21, KVM's in-kernel PIC
 *   cf8-write      port 0xCF8, coalesced by KVM on siovmm's request (no trip to siovmm)
 *   cfc-read       port 0xCFC, PCI config data: a trip to siovmm
 *   config-read    a whole legacy config read (0xCF8 write + 0xCFC read), as Linux's early PCI
 *                  scans do it
 * Needs root (iopl). Output lines: EXIT-COST-<probe>-US=<value>.
 */
#include <stdio.h>
#include <stdint.h>
#include <sys/io.h>
#include <time.h>

#define BATCH 1000
#define BATCHES 5

static double now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static volatile uint32_t sink;

static void probe_cpuid(int i)
{
	uint32_t a = 0, b, c = 0, d;
	(void)i;
	__asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
	sink += a;
}
static void probe_pic_read(int i) { (void)i; sink += inb(0x21); }
static void probe_cf8_write(int i) { (void)i; outl(0x80000000u, 0xcf8); }
static void probe_cfc_read(int i) { (void)i; sink += inl(0xcfc); }
static void probe_config_read(int i)
{
	/* Walk buses like Linux's AGP scan: most of them do not exist. */
	outl(0x80000000u | ((uint32_t)(i & 0xff) << 16), 0xcf8);
	sink += inl(0xcfc);
}

static void run(const char *name, void (*probe)(int))
{
	double best = 1e30;
	for (int b = 0; b < BATCHES; b++) {
		double t0 = now_us();
		for (int i = 0; i < BATCH; i++)
			probe(i);
		double per = (now_us() - t0) / BATCH;
		if (per < best)
			best = per;
	}
	printf("EXIT-COST-%s-US=%.1f\n", name, best);
}

int main(void)
{
	if (iopl(3)) {
		perror("exit_cost: iopl");
		return 1;
	}
	run("cpuid", probe_cpuid);
	run("pic-read", probe_pic_read);
	run("cf8-write", probe_cf8_write);
	run("cfc-read", probe_cfc_read);
	run("config-read", probe_config_read);
	return 0;
}
