"""The application: the command line, ``ef.run`` with its sessions, reports and interrupts.

The top layer: it may import every layer below; none of them imports it.
"""
