"""Shared foundations: errors, atomic I/O, paths, seeding, portable mode, the environment record, names, the stage entry frame."""
