"""The Textual monitor.  Talks to agents only through the control socket."""
