"""glibc heap settings of the engine."""

import sys

import pytest

from paddleclas_mc import memory

glibc_only = pytest.mark.skipif(not memory._glibc(), reason="needs glibc")


@glibc_only
def test_configure_heap_sets_the_threshold(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert memory.configure_heap() is True


def test_configure_heap_keeps_the_users_threshold(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert memory.configure_heap() is False


def test_release_free_memory_returns_a_bool():
    assert isinstance(memory.release_free_memory(), bool)


def test_no_op_without_glibc(monkeypatch):
    monkeypatch.setattr(memory, "_LIBC", None)
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert memory.configure_heap() is False
    assert memory.release_free_memory() is False
