"""Loader of the C++ fast path (not built yet: the reference path is used)."""


def load():
    raise ImportError("the C++ extension is not part of this build yet")
