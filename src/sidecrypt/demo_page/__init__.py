"""The browser demo: a page that shows, side by side, what the client sent, what the app
stored and what each caller reads back, with the bytes on the wire and the audit trail."""
