"""simfleet: simulated Raspberry Pi cars (systemd-nspawn hosts with sshd, a serial stand-in and Pi tool
stand-ins) for provisioning tests on one machine. See docs/simulation.md."""
