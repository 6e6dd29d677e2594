"""The control socket (``server.ControlServer``) and its client (``client``, ``hydrad ctl``).

See docs/control.md for the protocol and the security model.
"""
