"""Nurture: sequences, enrollments, the scheduler."""
