"""The tiny tokenizer's training text: MGIE-style edit instructions and plain English sentences."""

# Image-editing instructions in the style MGIE receives from users.
INSTRUCTIONS = """\
make the sky a sunset
turn the day into night
give him a beard
give her red hair
add a rainbow over the mountains
remove the car from the street
make it look like a painting by Van Gogh
turn the cat into a tiger
put a hat on the dog
make the water look frozen
change the season to winter
add snow to the trees
make the photo black and white
make it brighter
make the colors more vivid
turn the grass blue
add fireworks in the sky
replace the apple with an orange
make the man smile
make the woman look older
make him look younger
add sunglasses to the girl
remove the people in the background
make the house look abandoned
turn the lake into a desert
add a full moon
make it rain
add fog over the city
make the building taller
put a crown on the king
make the flowers purple
change the dress to blue
add a boat on the river
turn the car into a bicycle
make it look like a cartoon
make it look like an old photograph
add a dragon flying over the castle
remove the text from the sign
make the background blurry
add lightning to the storm
make the dog wear a scarf
give the statue a golden color
turn the forest into autumn
make the leaves orange and yellow
add a reflection in the window
make the room look cozy
add candles on the table
turn the lights off
make the kitchen modern
add a fireplace
change the sky to pink
make the clouds darker
add a sailboat near the shore
make the beach crowded
remove the trash from the park
make the road wet
add a red umbrella
turn him into a robot
make her hair curly
add freckles to her face
make the eyes green
give the bird bright feathers
make the sun bigger
add stars to the night sky
make it look like a watercolor
make it look like a pencil sketch
turn the photo into a comic book page
add a cup of coffee on the desk
make the cake chocolate
add strawberries on top
remove the glasses
give the man a mustache
make the horse white
turn the horse into a unicorn
add wings to the pig
make the mountain snowy
turn summer into spring
add cherry blossoms
make the street look like Paris
add a train on the bridge
make the bridge made of gold
change the wall color to green
add a painting on the wall
make the sofa leather
make the shirt striped
add a tie
make it look vintage
add a neon glow
make it look like a video game
turn the city into ruins
make everything underwater
add fish swimming around
make the ocean calm
add big waves
make the fire larger
put out the fire
add smoke from the chimney
make the tree bare
add apples to the tree
make the field of wheat golden
turn the clock to midnight
add a shadow under the chair
make the picture sharper
increase the contrast
reduce the saturation
make the skin tan
add a tattoo on his arm
give the child a balloon
make the balloon red
add a kite in the sky
make the desert green
add a cactus
make the sand white
turn the puppy into a kitten
make the kitten sleep
add a pair of boots
make the jacket yellow
make it look like it was taken at dawn
add a soft warm light
make the scene spooky
add a ghost in the hallway
make the pumpkin glow
decorate the room for Christmas
add presents under the tree
make the bread look fresh
remove the crumbs
make the teeth whiter
open his eyes
close the door
open the window
add curtains
let the cat wear a bow tie
make the sky look like outer space
add planets in the background
turn the moon into the earth
make the astronaut float
add a flag on the moon
"""

# General English so that common words and subwords get real merges.
SENTENCES = """\
The quick brown fox jumps over the lazy dog.
A picture is worth a thousand words, but a good edit can say even more.
She opened the window and let the cool morning air fill the room.
The children played in the park until the sun went down.
We walked along the beach and collected shells in a small bucket.
He painted the fence white and then sat down to rest in the shade.
The old lighthouse stood on the rocks at the edge of the sea.
Every evening the city lights turn on one by one.
My grandmother keeps a garden full of roses, tulips, and sunflowers.
The train was late, so we waited on the platform and talked about the weather.
In winter the lake freezes and people skate across the ice.
The museum has paintings from many different centuries and countries.
Please describe the image in detail and explain what is happening.
The photograph shows a family having a picnic under a large oak tree.
There is a red car parked in front of a small yellow house.
The man is wearing a blue jacket, a gray scarf, and black shoes.
The woman is holding an umbrella while walking through the rain.
Two dogs are running across a green field chasing a ball.
A cat is sleeping on the windowsill in the warm afternoon sun.
The mountains in the distance are covered with snow.
Clouds gathered over the valley and soon it began to rain.
The bakery on the corner sells fresh bread every morning.
They built a wooden bridge across the river last summer.
The teacher asked the students to write a short story about their holidays.
It is important to drink water and get enough sleep.
The assistant should answer the question clearly and politely.
I would like to change the color of the background to something brighter.
Could you make the image look more realistic and natural?
The sunset painted the sky with shades of orange, pink, and purple.
At night the stars shine brightly above the quiet village.
The flowers in the vase were arranged by a local artist.
A small boat drifted slowly down the river.
The forest was dark and full of tall pine trees.
The street was crowded with people shopping for the festival.
She smiled when she saw the birthday cake with candles on top.
He fixed the old bicycle and rode it to school.
The kitchen smelled of coffee, cinnamon, and warm apples.
The storm knocked down several trees near the road.
After the rain a bright rainbow appeared over the hills.
The castle on the hill has four towers and a large gate.
The robot walked into the room and greeted everyone.
Artificial intelligence can help people edit their photos quickly.
The model looks at the image and the instruction, and then it imagines the result.
This image shows a beautiful landscape with a lake and a forest.
The user wants to see what the picture would look like in another style.
Let me think about how the scene would change.
The result should keep the original composition while following the instruction.
The sky would become darker and the lights of the buildings would be visible.
The leaves would turn red and yellow, and some would fall to the ground.
The person would have a thick beard and look a little older.
The water would look calm and reflect the colors of the sunset.
The snow would cover the roofs, the cars, and the streets.
The photo would look like an oil painting with thick brush strokes.
The colors would be warmer and the shadows would be softer.
What is the weather like today?
Where did you put the keys?
How many apples are there on the table?
Why is the sky blue during the day and black at night?
Which one do you like better, the red one or the green one?
When will the next bus arrive at the station?
Who painted this picture of the sea?
I think the second version looks much better than the first.
Thank you for your help, it was very useful.
Sure, here is a detailed description of the edited image.
Of course, I can help you with that.
The answer depends on the lighting, the angle, and the subject of the photo.
First, identify the main object; second, change its color; third, adjust the light.
Her brother's dog isn't allowed on the couch, but it doesn't care.
They're going to the concert tonight, aren't they?
It's a long way to the top of the hill, so we'll need water.
The price went up by 20 percent in 2023, from 15 dollars to 18 dollars.
Call me at 9:30 tomorrow morning or after 5 in the afternoon.
The recipe needs 2 eggs, 3 cups of flour, and 1 cup of milk.
Chapter 12 begins on page 245.
The meeting is scheduled for Monday, June 3rd, at 10:00.
Note: the file must be saved before the program exits.
Warning: do not touch the hot surface!
Question: what color is the car? Answer: the car is red.
Use a soft brush (size 12) and paint the edges gently.
The list includes apples, bananas, cherries, grapes, and lemons.
He said, "I will be there soon," and hung up the phone.
She asked, "Is it going to snow tomorrow?"
The sign read: "Closed for repairs; open again next week."
Visit the website at example.com for more information.
The temperature dropped to -5 degrees last night.
A + B = C, and 3 * 4 = 12, while 10 / 2 = 5.
Use the #hashtag and @mention to reach more people.
The score was 3-1 at half time & 4-2 at the end.
Her email address is anna_smith@example.org.
The path is /home/user/images/photo_01.png on the server.
Prices: $5, $10, and $20; discounts up to 50%.
Press Ctrl+C to copy and Ctrl+V to paste [text] into the {box}.
The pipe | symbol, the tilde ~, the caret ^ and the backtick ` are rare.
Python uses the <= and >= operators for comparisons.
This is the end of the story; the heroes lived happily ever after.
Bright colors, strong contrast, and sharp details make a photo stand out.
Soft light from the window falls on the table and the chairs.
The garden looks wonderful in spring when everything is in bloom.
People gathered around the fire to tell stories and sing songs.
The airplane flew above the clouds toward the setting sun.
A lonely tree stands in the middle of a wide green meadow.
The waves crashed against the rocks and sprayed white foam.
Deep in the jungle there are colorful birds and huge butterflies.
The desert stretches for miles under the burning sun.
The little girl drew a house, a tree, and a big yellow sun.
Old photographs often look faded and slightly brown.
Modern cameras can capture amazing detail even in low light.
The painter mixed blue and yellow to make green.
The portrait shows a young woman with long dark hair.
The city skyline glows with lights after sunset.
Fresh snow makes the whole world look clean and quiet.
The dog wagged its tail happily when its owner came home.
Cats love to sit in boxes and watch birds through the window.
Horses grazed peacefully in the field beside the farmhouse.
The fisherman pulled his net out of the water at dawn.
The astronaut looked back at the blue planet from space.
"""
