"""Devices and processes: the mesh, partition rules, multi-host start-up and
the process runtime, shared by training and sampling."""
