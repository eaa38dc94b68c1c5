"""Same as `lrl-export`."""
from lrlightning.cli import export

if __name__ == "__main__":
    export()
