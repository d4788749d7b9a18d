require "sinatra/base"

# The talk's demo: a Sinatra app, staged by the ruby buildpack.
class App < Sinatra::Base
  get "/" do
    "hello from sinatra\n"
  end
end
