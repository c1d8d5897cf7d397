from tests.support.browser import console  # noqa: F401  (fixture)
