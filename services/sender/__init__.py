"""Sender: deliveries, SMTP hand-off, suppression."""
