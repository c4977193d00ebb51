"""Gymnasium environments of s2d."""
