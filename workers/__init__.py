"""Kernel workers (one per device, computing kernel blocks and their vjp) and their protocol."""
