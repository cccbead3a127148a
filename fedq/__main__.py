from fedq.cli import main

main()
