"""Tracker: sent-message registry, engagement from pixels, clicks, unsubscribes,
replies and provider webhooks."""
