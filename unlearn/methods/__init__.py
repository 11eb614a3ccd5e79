"""Unlearning methods, registered by name. Each lives in its own module; importing this package
registers them all."""

from . import ga, gd, kl, merge, npo, npo_kl, rmu, sha256, simnpo, sugd  # noqa: F401  (registration)
from .base import METHODS, Example, Method, UnlearnConfig, get_method, register

__all__ = ["METHODS", "Example", "Method", "UnlearnConfig", "get_method", "register"]
