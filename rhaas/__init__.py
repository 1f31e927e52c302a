"""rhaas: a recursive HaaS with fast (kexec) provisioning."""

__version__ = "0.1.0"
