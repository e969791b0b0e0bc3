"""The TUI's widgets: each draws one aspect of a guest's migration from a GuestState."""
