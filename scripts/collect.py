"""Same as `lrl-collect`."""
from lrlightning.cli import collect

if __name__ == "__main__":
    collect()
