import sys

from morph_lightning.cli import main

if __name__ == "__main__":
    if sys.argv[1:2] == ["demo"]:  # the embedded-world demo; everything else is LightningCLI
        from morph_lightning.demo import main as demo_main

        demo_main(sys.argv[2:])
    else:
        main()
