"""What every touchstream service runs on."""
