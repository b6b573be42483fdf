"""A second KVM backend for the tests: KVM-SVM inside QEMU TCG.

``python3 -m vmm.svm -- CMD...`` (or ``vmm svm -- CMD...``) boots Debian's
cloud kernel in ``qemu-system-x86_64 -accel tcg -cpu max``, loads kvm-amd,
and runs CMD in the project directory with a copy of this Python; its output
streams out and its exit status is returned. Modules: ``cpio`` (initramfs
format), ``image`` (what goes in, cached by a hash of its inputs), ``qemu``
(boot, stream, exit status), ``__main__`` (the command line).
"""
