"""``python -m extproc.fakeprovider --port N``: run the fake OpenAI / Anthropic upstream."""

from extproc.fakeprovider.server import main

if __name__ == "__main__":
    main()
