"""Output modules, each against its real server (or the most faithful stand-in)."""
