"""Same as `lrl-collect`."""
from lrlightning.app.cli import collect

if __name__ == "__main__":
    collect()
