from dsckpt.cli.app import main

main()
