"""A verifier for tests/test_rl.py, imported through config.verifier = "rl_bandit:low_first_byte" (tests/ is on sys.path) as a user's
own verifier would be."""


def low_first_byte(response: str, answer: str) -> bool:
    return bool(response) and ord(response[0]) < 64
