"""``python -m serving --store ... --model ... [vLLM args]``."""

from serving.cli import main

if __name__ == "__main__":
    main()
