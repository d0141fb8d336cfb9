/*
 * kvm_ballast: holds one idle KVM VM for the whole life of a sandbox, so that the sandbox
 * kernel never rewrites its own code while tests run (docs/testing.md, "What the failures were": the sandbox stall).
 *
 * Creating the first VM, and the first vCPU's local APIC changing state, flip static keys in
 * the sandbox kernel (preempt_notifier_key in __schedule; KVM's apic_hw_disabled and
 * apic_sw_disabled): Linux then live-patches every site with INT3-based text_poke_bp. Under
 * QEMU's multi-threaded TCG that patching was caught leaving both sandbox CPUs executing a
 * breakpoint that was no longer in memory (asm_exc_int3 from __schedule), forever. The keys
 * are reference counts: with this VM alive, and its one vCPU's APIC disabled and never
 * enabled by software, each stays at 1 or more, so the VMs of the tests start and stop
 * without any code patching.
 *
 * Runs in the sandbox's prologue: sets everything up, forks, and the parent exits 0 once the
 * child holds the VM (nonzero, with a message, if any step failed). The child sleeps forever.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define MSR_IA32_APICBASE 0x1b
#define APIC_DEFAULT_BASE 0xfee00000ULL

static int fail(const char *what) {
	perror(what);
	return 1;
}

int main(void) {
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		return fail("kvm_ballast: /dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		return fail("kvm_ballast: KVM_CREATE_VM");
	if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
		return fail("kvm_ballast: KVM_CREATE_IRQCHIP");
	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		return fail("kvm_ballast: KVM_CREATE_VCPU");
	/* Disable the vCPU's local APIC (APIC base MSR, enable bit 11 clear): the hardware-
	 * disabled key stays counted too, after KVM's reset had enabled it. */
	struct {
		struct kvm_msrs hdr;
		struct kvm_msr_entry entry;
	} msrs;
	memset(&msrs, 0, sizeof(msrs));
	msrs.hdr.nmsrs = 1;
	msrs.entry.index = MSR_IA32_APICBASE;
	msrs.entry.data = APIC_DEFAULT_BASE;
	if (ioctl(vcpu, KVM_SET_MSRS, &msrs) != 1)
		return fail("kvm_ballast: KVM_SET_MSRS (APIC base)");
	pid_t child = fork();
	if (child < 0)
		return fail("kvm_ballast: fork");
	if (child > 0)
		return 0;
	setsid();
	for (;;)
		pause();
}
