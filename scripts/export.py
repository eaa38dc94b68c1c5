"""Same as `lrl-export`."""
from lrlightning.app.cli import export

if __name__ == "__main__":
    export()
