"""The audio engine: a child process that owns the sound devices (``python -m hydrad.engine``).

``wire`` is the pipe protocol, ``client`` the daemon's side; everything else runs in the child.
"""
