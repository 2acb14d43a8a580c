"""Development-only code: parity runners for ../shared/golden*, the fixture checker and synthetic motions.

Never shipped: build_addon.py leaves this package out of the extension zips. It imports the engine, never
the reverse.
"""
