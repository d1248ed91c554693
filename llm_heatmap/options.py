"""Option groups: a function with many options takes a few small frozen dataclasses, and still accepts
each option as a keyword of its own (`run_atlas(..., resume=True)` is `run=RunOptions(resume=True)`)."""

from __future__ import annotations

from dataclasses import fields, replace


def spread(keywords: dict, *groups):
    """`groups` with every keyword argument replacing the field of its name in the group that has one;
    a name no group has is a `TypeError`, as for any unexpected keyword."""
    groups = list(groups)
    for name, value in keywords.items():
        for index, group in enumerate(groups):
            if name in {field.name for field in fields(group)}:
                groups[index] = replace(group, **{name: value})
                break
        else:
            raise TypeError(f"unexpected keyword argument {name!r}")
    return groups
