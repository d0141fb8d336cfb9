# A sandbox prelude (SIOVMM_SANDBOX_PRELUDE, tests/src/lib.rs) that counts KVM's exits by
# reason for each case: a histogram trigger on kvm:kvm_exit and kvm:kvm_userspace_exit, printed
# as @@EXITS / @@UEXITS lines and reset after each case (after the flight record, printed as
# the prologue does less its sandbox-kernel symbol names). Reasons are the vendor's exit codes (the sandbox's CPU is AMD: SVM 0x78 = 120 HLT,
# 0x7b = 123 IOIO, 0x7c = 124 MSR, 0x60 = 96 INTR, 0x400 = 1024 NPF); user-space reasons are
# KVM_EXIT_* (2 IO, 6 MMIO). How docs/vfio.md compared the exit mix of siovmm and Cloud
# Hypervisor:
#   SIOVMM_SANDBOX_PRELUDE="$(cat tests/exit-histogram.sh)" SIOVMM_TEST_VERBOSE=1 cargo test ...
kvm_flight_record() {
  if [ -r $r/trace ]; then kvm_flight_records | sed 's/^/@@KVM-TRACE /'; echo > $t/trace; echo > $r/trace; fi
  grep -v '^#' $t/events/kvm/kvm_exit/hist | grep -E 'exit_reason|Hits' | sed 's/^/@@EXITS /'
  grep -v '^#' $t/events/kvm/kvm_userspace_exit/hist | grep -E 'reason|Hits' | sed 's/^/@@UEXITS /'
  echo '!hist:keys=exit_reason' >> $t/events/kvm/kvm_exit/trigger
  echo 'hist:keys=exit_reason' >> $t/events/kvm/kvm_exit/trigger
  echo '!hist:keys=reason' >> $t/events/kvm/kvm_userspace_exit/trigger
  echo 'hist:keys=reason' >> $t/events/kvm/kvm_userspace_exit/trigger
}
echo 'hist:keys=exit_reason' >> $t/events/kvm/kvm_exit/trigger || echo '@@EXITS no hist'
echo 'hist:keys=reason' >> $t/events/kvm/kvm_userspace_exit/trigger || echo '@@UEXITS no hist'
