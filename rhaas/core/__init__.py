"""Policy: leasing, freeing, reconciling, networking, power routing and kexec provisioning."""
