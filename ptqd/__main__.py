from ptqd.cli import main

main()
