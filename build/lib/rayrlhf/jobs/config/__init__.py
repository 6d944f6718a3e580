"""Typed config schemas (pydantic), the only home of defaults; light to import (no torch, no Ray)."""
