"""Wire protocol and identities shared by workers and coordinators; imports nothing of ours."""
