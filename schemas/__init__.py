"""Event contracts shared by every touchstream service."""
