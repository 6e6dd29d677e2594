"""The daemon's trio tasks and how they are wired; see docs/architecture.md."""
