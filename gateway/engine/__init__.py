"""Forwarding engines: the only code that touches client and upstream sockets."""
