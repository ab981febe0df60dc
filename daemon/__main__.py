from daemon.entry import main

if __name__ == "__main__":  # not when a spawned model process imports it
    main()
