"""Adapters: one protocol or file each (inventory store, HIL client/server, SSH, BMC)."""
