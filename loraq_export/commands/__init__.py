"""What each CLI command does, beyond parsing its arguments."""
