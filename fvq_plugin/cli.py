import sys


def main(argv=None):
    print("fvq-rater: not yet", file=sys.stderr)
    return 1
