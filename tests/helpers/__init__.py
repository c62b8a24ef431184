"""Builders, references and fault injectors the tests share (tests/ is on sys.path: `from helpers.x import`).

Test files import from here and from conftest fixtures, never from one another."""
