from vramfit.cli import main

main()
