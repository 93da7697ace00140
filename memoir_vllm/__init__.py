"""MEMOIR lifelong model editing."""
